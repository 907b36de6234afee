"""The one exception the data package raises for a bad config or bad input data."""


class DataError(ValueError):
    """A data config or dataset the pipeline cannot use; the message names the fix."""

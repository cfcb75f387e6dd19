"""The one exception type for bad training input (the CLI prints it and exits with status 2)."""


class TrainError(ValueError):
    """Bad input to the trainer: flags, data, target folder, checkpoint."""

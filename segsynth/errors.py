"""Errors that reach the user: each names the file (or config key) and the problem."""


class SegsynthError(Exception):
    """Base class of errors segsynth raises deliberately."""


class InputDataError(SegsynthError):
    """A dataset file is missing, corrupt or inconsistent with the declared dataset."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(SegsynthError):
    """A config entry names something that does not exist or cannot work."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"config key '{key}': {problem}")

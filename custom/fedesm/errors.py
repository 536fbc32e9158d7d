"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class FedesmError(Exception):
    """A problem with the user's input or environment (bad file, missing data, denied path...)."""


class DataError(FedesmError):
    """Bad input data. The message names the file, the record id and the line where known."""

    def __init__(self, message: str, path=None, record_id=None, line=None):
        parts = []
        if path is not None:
            parts.append(str(path) + (f":{line}" if line is not None else ""))
        if record_id is not None:
            parts.append(f"record {record_id!r}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path, self.record_id, self.line = path, record_id, line

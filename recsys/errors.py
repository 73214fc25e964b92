"""The few exception types the library raises.

Every message follows `<where>: <what> (got <value>, expected <constraint>)[; <fix>]`.
All three are plain `ValueError`/`RuntimeError` subclasses with a single string argument, so
they pickle and cross Ray process boundaries unchanged.
"""


class ConfigError(ValueError):
    """An experiment, model or server configuration is invalid."""


class SchemaError(ValueError):
    """Data does not match its DatasetSchema or FeatureSchema."""


class ArtifactError(RuntimeError):
    """A model artifact is missing, corrupt, or of an unsupported format."""


class DataError(RuntimeError):
    """A dataset could not be obtained or failed its checksum."""


class Interrupted(RuntimeError):
    """A long job was stopped by the user (Ctrl-C); the message says what it kept."""


# What a command line reports as one `error:` line with exit code 2: the user can fix these
# (a setting, the data, an artifact path); anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, SchemaError, DataError, ArtifactError)

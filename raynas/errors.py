"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user. The message names the field and what is allowed."""


class ConfigError(UserError):
    """A configuration file or option is invalid."""

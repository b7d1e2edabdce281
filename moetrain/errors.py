"""The package's error for bad input, shared by the config, its checks and every command line."""


class ConfigError(ValueError):
  """A bad config value, file or override; the message names the field or file."""

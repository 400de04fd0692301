"""Errors a user can cause and fix; the entry points print their message and exit."""


class UserError(Exception):
  """Something the user can fix (a file, a flag, a checkpoint); the message says how."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the key and what would work."""

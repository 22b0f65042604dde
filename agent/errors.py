"""The agent's error tree.

::

    AgentError                  anything the agent reports to a person
    ├── ConfigError             the config file or the API key is missing or invalid (exit 78)
    ├── ScannerError            a scanner cannot be found, opened or read
    ├── StoreError              the SQLite queue cannot be opened or written
    ├── DeliveryError           Meetch cannot be reached or refuses us
    ├── DataError               a file given to the agent (an import) is malformed (exit 65)
    └── NotAvailableYet         a contract verb or key that this version does not build yet

Library code raises these; only ``cli.py`` turns them into messages and exit codes.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent reports to a person."""


class ConfigError(AgentError):
    """The configuration (file, key or API key) is missing or invalid."""


class ScannerError(AgentError):
    """A scanner cannot be found, opened or read."""


class StoreError(AgentError):
    """The SQLite queue cannot be opened, read or written."""


class DeliveryError(AgentError):
    """Meetch cannot be reached or refuses the agent."""


class DataError(AgentError):
    """A file handed to the agent, such as a queue import, is malformed."""


class NotAvailableYet(AgentError):
    """A contract verb or key that this version of the agent does not build yet."""

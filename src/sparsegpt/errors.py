"""The one exception type the library raises for problems a user can act on."""


class SparseGPTError(Exception):
    """Bad input or an unrecoverable numerical problem, with a message meant for the user.

    The command line prints the message as a single line and exits with status 2.
    """

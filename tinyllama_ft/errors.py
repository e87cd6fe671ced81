"""The one exception type the command line turns into a one-line message, and the argument parser
whose mistakes become that exception."""

from __future__ import annotations

import argparse


class UserError(ValueError):
    """Bad input or configuration: the message names the problem and the fix."""


class ArgParser(argparse.ArgumentParser):
    """argparse, with a bad argument raised as one `UserError` line (argparse alone prints its usage and exits)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")

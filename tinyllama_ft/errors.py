"""The one exception type the command line turns into a one-line message, and the argument parser
whose mistakes become that exception."""

from __future__ import annotations

import argparse


class UserError(ValueError):
    """Bad input or configuration: the message names the problem and the fix."""


class ArgParser(argparse.ArgumentParser):
    """argparse, with a bad argument raised as one `UserError` line (argparse alone prints its usage and exits)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}{self.did_you_mean(message)}")

    def did_you_mean(self, message: str) -> str:
        """" (did you mean --name?)" for the first unrecognized flag, case aside; "" when none is close."""
        import difflib

        flags = [w.split("=")[0] for w in message.split() if w.startswith("--")] if "unrecognized" in message else []
        options = [o for o in self._option_string_actions if o.startswith("--")]
        match = difflib.get_close_matches(flags[0].lower(), options, 1) if flags else []
        return f" (did you mean {match[0]}?)" if match else ""

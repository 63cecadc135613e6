"""The Typer application and the error boundary every command runs inside."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from privmed.errors import PrivmedError

app = typer.Typer(
    name="privmed",
    help="Privacy-preserving machine learning on medical images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Fetch, inspect and split image datasets.", no_args_is_help=True)
ledger_app = typer.Typer(help="Inspect and manage a privacy-budget ledger.",
                         no_args_is_help=True)
encrypted_app = typer.Typer(help="Prepare models for encrypted (CKKS) inference.",
                            no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(encrypted_app, name="encrypted")
audit_app = typer.Typer(help="Attack your own models: membership inference, gradient "
                        "inversion.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(ledger_app, name="ledger")
deid_app = typer.Typer(help="De-identify data before it leaves the hospital.",
                       no_args_is_help=True)
app.add_typer(deid_app, name="deid")

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print one sentence to stderr and exit with ``code``."""
    err_console.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def main() -> None:
    """Console-script entry point: people get one sentence, never a traceback."""
    try:
        app()
    except PrivmedError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("Interrupted; everything written so far (checkpoints, ledger) is kept.", 130)
    except Exception as exc:  # an unexpected bug: still one line unless debugging
        if os.environ.get("PRIVMED_DEBUG"):
            raise
        fail(f"Internal error ({type(exc).__name__}: {exc}); rerun with PRIVMED_DEBUG=1 for "
             "the traceback and please report it.", 1)
    sys.exit(0)

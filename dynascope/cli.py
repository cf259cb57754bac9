"""The ``dynascope`` console command.

Subcommands register themselves in :data:`COMMANDS` (name -> (help, add_arguments, run)); each
``run(args) -> int`` returns the process exit code. Errors a user can fix (bad paths, bad files,
bad options) are printed as one readable line with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {}


class UsageError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``run(args) -> int`` as subcommand ``name``."""

    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return wrap


def app_path() -> Path:
    """The Streamlit entry script (``app/main.py`` beside the package folders)."""
    return Path(__file__).resolve().parent.parent / "app" / "main.py"


def _app_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the app "
                        "to the network, do so deliberately)")  # fmt: skip
    p.add_argument("--runs-dir", default=None, help="folder holding run folders (default ./runs)")
    p.add_argument("--headless", action="store_true", help="do not open a browser")


# The settings of app/.streamlit/config.toml (what `streamlit run app/main.py` reads),
# passed on the command line so that `dynascope app` keeps them wherever it is started.
APP_SERVER_OPTIONS = {
    "server.enableXsrfProtection": "true",
    "server.enableCORS": "true",
    "server.maxUploadSize": "1024",  # MB per file; app/lib/uploads.py MAX_UPLOAD_MB checks the same
    "browser.gatherUsageStats": "false",
    "client.toolbarMode": "minimal",  # no "Deploy" button
}


def app_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line of ``dynascope app``."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path()),
           "--server.port", str(args.port), "--server.address", args.address]  # fmt: skip
    for key, value in APP_SERVER_OPTIONS.items():
        cmd += [f"--{key}", value]
    if args.headless:
        cmd += ["--server.headless", "true"]
    return cmd


def demos_enabled(env: dict[str, str]) -> bool:
    """``DYNASCOPE_DEMOS`` is not set to 0/false/no/off (the app's own switch)."""
    return env.get("DYNASCOPE_DEMOS", "1").strip().lower() not in ("0", "false", "no", "off")


#: set by ``dynascope app`` for the app: the demos are built by the background process it started
DEMOS_BUILDER_ENV = "DYNASCOPE_DEMOS_BUILDER"


def start_demo_build(runs_dir: Path) -> subprocess.Popen:
    """Start ``dynascope.recipes.demos.main([runs_dir])`` in a background process: it builds the missing
    demo runs with the status file ``runs_dir/.demos_status.json`` the app shows, or exits at once when
    every demo is complete or another build is running. Its output goes to ``runs_dir/.demos.log``."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    code = "import sys; from dynascope.recipes.demos import main; sys.exit(main(sys.argv[1:]))"
    with open(runs_dir / ".demos.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code, str(runs_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


@command("app", "start the web app with the built-in demo runs", _app_args)
def run_app(args: argparse.Namespace) -> int:
    script = app_path()
    if not script.exists():
        raise UsageError(f"the app script {script} is missing (install dynascope with `pip install -e .`)")
    env = dict(os.environ)
    runs_dir = Path(args.runs_dir or env.get("DYNASCOPE_RUNS_DIR") or "runs").expanduser().resolve()
    env["DYNASCOPE_RUNS_DIR"] = str(runs_dir)
    if not is_loopback(args.address):  # chosen explicitly on the command line: the app may serve it
        env[ALLOW_REMOTE_ENV] = "1"
    children: list[subprocess.Popen] = []
    if demos_enabled(env):  # the demos are under way before the first page is opened
        try:
            children.append(start_demo_build(runs_dir))
            env[DEMOS_BUILDER_ENV] = "process"
        except OSError as exc:
            print(f"dynascope app: demo runs not started ({exc})", file=sys.stderr)
    server = subprocess.Popen(app_command(args), env=env)
    return wait_forwarding_signals(server, children)


def wait_forwarding_signals(main: subprocess.Popen, others: list[subprocess.Popen]) -> int:
    """Wait for ``main``; SIGTERM/SIGINT/SIGHUP sent to this process are passed on to ``main`` and
    ``others`` (so no server is left running without its parent), then wait for them all."""
    children = [main, *others]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        code = main.wait()
        for child in others:  # the demo builder goes with the app
            if child.poll() is None:
                child.terminate()
            child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


#: ``1`` lets the app serve on a non-loopback address (``dynascope app --address`` sets it)
ALLOW_REMOTE_ENV = "DYNASCOPE_ALLOW_REMOTE"


def is_loopback(address: str | None) -> bool:
    """Whether ``address`` serves this machine only (``127.x``, ``::1``, ``localhost``)."""
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return address == "localhost"


def build_parser() -> argparse.ArgumentParser:
    from dynascope import commands  # noqa: F401 - registers probe, probes, export, recipe, runs

    parser = argparse.ArgumentParser(prog="dynascope", description="Training-dynamics analysis workbench.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"dynascope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dynascope runs --json | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 141  # 128 + SIGPIPE, as a shell tool killed by the broken pipe


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

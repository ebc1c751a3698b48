"""How ``pcq -h`` reads: what to type, never a Python type.

Typer shows each value's Python type where a user looks for what to type
(``<str>``, ``<int range> [x>=1]``, ``<bool>`` beside a flag).  The options
declare their own metavars (``N``, ``SECONDS``, ``URL``) and say their limits in
their help; :func:`plain_help` removes what Typer adds on top, once, for every
command: the type beside a flag (a flag takes no value), the range notation
(the limit is still checked: Typer checks it from the declaration, not from what
the help shows), and the braces and types around arguments.  Where Typer offers
no setting, the help methods of the parameter objects are replaced on the
object; a Typer that renamed them shows its own notation again, nothing breaks.
"""

from __future__ import annotations

from typing import Any

from typer.main import get_current_context  # type: ignore[attr-defined]


def plain_help(cli: Any) -> None:
    """Clear the Python types and ranges from the help of ``cli`` and every
    command under it (``-h`` included)."""
    commands = [cli]
    while commands:
        command = commands.pop()
        commands.extend(getattr(command, "commands", {}).values())
        context = command.context_class(command, help_option_names=["-h", "--help"])
        helper = command.get_help_option(context)
        for param in [*command.params, *([helper] if helper is not None else [])]:
            if getattr(param, "is_flag", False):
                param.metavar = ""  # shown as the type column: empty for a flag
            if hasattr(param, "min"):
                param.min = param.max = None  # display only
            if param.param_type_name == "argument":
                _plain_argument(param)


def _plain_argument(param: Any) -> None:
    """``PRODUCER HANDLER...`` in the usage line, as click writes arguments,
    and no type column (Typer shows ``{producer}``, ``<list[str]>``)."""
    name = param.metavar or param.name.upper()
    shown = name + ("..." if param.nargs != 1 else "")
    param.metavar = name
    param.display_type_rich = lambda ctx: None
    param._usage_display_name = lambda: shown if param.required else f"[{shown}]"
    param._rich_display_name = lambda: shown


def click_context() -> Any:
    """The context of the command being run (None outside one): a usage error
    raised in a command's body carries it, so it shows the command's usage line."""
    return get_current_context(silent=True)

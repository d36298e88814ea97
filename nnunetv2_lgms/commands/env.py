"""``nnunetv2_lgms env``: print the export for ``eval "$(nnunetv2_lgms env)"``."""
from __future__ import annotations

import os
import shlex

from nnunetv2_lgms.discovery import ENV_VAR, ext_trainer_value


def add_arguments(parser) -> None:
    parser.add_argument("--shell", choices=["sh", "fish", "powershell"], default="sh",
                        help="syntax of the printed line (default: sh/bash/zsh)")


def run(args) -> int:
    value = ext_trainer_value(os.environ.get(ENV_VAR))
    if args.shell == "fish":
        print(f"set -gx {ENV_VAR} {shlex.quote(value)}")
    elif args.shell == "powershell":
        print(f"$env:{ENV_VAR} = '{value}'")
    else:
        print(f"export {ENV_VAR}={shlex.quote(value)}")
    return 0

"""``nnunetv2_lgms`` console script. Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``env`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "env": ("nnunetv2_lgms.commands.env", "print the shell export that lets stock nnUNetv2_* commands find our trainers"),
    "doctor": ("nnunetv2_lgms.commands.doctor", "check versions, environment variables and the trainer lookup"),
    "demo": ("nnunetv2_lgms.commands.demo", "synthetic dataset -> plan -> train LGMSNet and nnU-Net -> predict -> table"),
    "paper-check": ("nnunetv2_lgms.commands.paper_check", "parameters and FLOPs at the published configurations"),
    "convert": ("nnunetv2_lgms.commands.convert", "public dataset release -> nnU-Net raw dataset (busi, kvasir, btcv, ...)"),
    "profile": ("nnunetv2_lgms.commands.profile", "params, FLOPs, timings and memory of trainers' networks on a plan"),
    "compare": ("nnunetv2_lgms.commands.compare", "cross-validation table of trainers from nnU-Net's summary.json files"),
    "evaluate-unseen": ("nnunetv2_lgms.commands.evaluate_unseen", "trained model on an unseen dataset, paper Table 2"),
    "export": ("nnunetv2_lgms.commands.export", "trained folds -> ONNX / OpenVINO models checked against PyTorch"),
    "predict": ("nnunetv2_lgms.commands.predict", "nnU-Net's prediction with the network on ONNX Runtime / OpenVINO"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The full parser; with ``command``, only that subcommand's module is imported for its arguments."""
    parser = argparse.ArgumentParser(prog="nnunetv2_lgms", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``wgan-kernels`` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    from .info import collect, format_info

    print(format_info(collect()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wgan-kernels", description="Fused kernels for Wasserstein GAN critics")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, the extension's build, and which backend each op uses here")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

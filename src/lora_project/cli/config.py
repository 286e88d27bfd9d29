"""`lora-project config`: the resolved configuration, or every field explained."""

from __future__ import annotations

from lora_project.cli._common import add_config_args, load_cfg


def register(sub) -> None:
    p = sub.add_parser("config", help="show the resolved configuration or explain every field")
    add_config_args(p)
    p.add_argument("--explain", action="store_true", help="every field with default, range and meaning")
    p.set_defaults(handler=run)


def run(args, paths) -> None:
    if args.explain:
        from lora_project.config import explain

        print(explain())
    else:
        print(load_cfg(args, paths).to_yaml(), end="")

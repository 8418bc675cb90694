"""`onerec`: one command line, one sub-command per job; each calls one function of the package that owns it.

Invariant: a command's module is imported only when that command is parsed or runs, so `onerec --help`,
`onerec broker` and `onerec topics` load neither torch nor Ray (tests/test_packaging.py checks it).
Every sub-command takes `--config FILE.toml`, `--preset NAME` and repeated `--set section.key=value`.
A module registered here provides `add_arguments(parser)` and `main(args, cfg) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("actors.driver", "run the whole loop on one machine (broker, Ray, Faust, learner, replicas, bridge, simulator)"),
    "ab": ("actors.ab", "A/B arms (gbpo, ecpo, sft, gbpo-legacy, popular, random, oracle) under the same traffic"),
    "broker": ("infra.broker", "start the embedded Kafka-compatible broker (Tansu) and wait"),
    "topics": ("streaming.topics", "create the namespaced, co-partitioned topics on a cluster"),
    "worker": ("streaming.worker", "run the join worker: impressions + feedback into samples (batched or Faust engine)"),
    "replay": ("simulator.replay", "publish a KuaiRand log as impressions and feedback in time order"),
    "pretrain": ("offline.pretrain", "train a model on the KuaiRand week for a bounded time and print recommendations"),
    "serve": ("actors.serve", "run the HTTP bridge in front of serving replicas"),
    "eval": ("offline.evaluate", "offline evaluation: `eval sequences FILE` or `eval replay LOG`"),
    "simulator": ("simulator.fit", "fit the KuaiRand user simulator and check it against the log"),
    "drift": ("actors.drift", "print the drift table per weight version and write its plot"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every sub-command; only `command`'s module is imported to add its own arguments.

    The others get the common options only: their arguments appear once they are the command parsed.
    """
    parser = argparse.ArgumentParser(prog="onerec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="TOML file with [model], [train], [stream], [loop], [serve], [simulator], "
                                        "[drift] tables")
        p.add_argument("--preset", help="model preset: tiny, 0.1B, 0.2B, 0.5B, 1B, 2B, 4B, 8B, 4B-A0.5B")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable)")
        p.set_defaults(_module=module_name)
        if name != command:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a command whose module is missing is a bug, say so
            p.set_defaults(_missing=str(exc))
            continue
        module.add_arguments(p)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The sub-command named in argv: its first word that is not an option (the top level has no valued options)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"onerec {args.command}: not available ({args._missing})", file=sys.stderr)
        return 2
    from onerec.config import Config

    try:
        cfg = Config.load(args.config, overrides=args.set, preset=args.preset)
    except (ValueError, OSError) as exc:
        print(f"onerec {args.command}: bad configuration: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    return int(module.main(args, cfg) or 0)


if __name__ == "__main__":
    sys.exit(main())

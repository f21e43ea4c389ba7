"""`raddiagseg describe`: parameter counts per component of a preset or a checkpoint (torch imported lazily)."""

from raddiagseg.model.config import PRESETS


def register(subparsers):
    p = subparsers.add_parser("describe", help="print the parameter count of each model component and how many train")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=tuple(PRESETS), default=None, help="preset to describe (default: demo)")
    source.add_argument("--checkpoint", metavar="DIR", help="describe a saved checkpoint folder instead")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_describe)


def run_describe(args):
    import json

    from raddiagseg.cli import CommandError
    from raddiagseg.model.describe import describe_checkpoint, describe_preset, format_table

    if args.checkpoint:
        try:
            info = describe_checkpoint(args.checkpoint)
        except FileNotFoundError as exc:
            raise CommandError(str(exc)) from None
    else:
        info = describe_preset(args.preset or "demo")
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0

"""The benchmark's one entry point, run from the repository root.

    python -m bench list                             # the matrix's named subsets and the GPU calls, one line each
    python -m bench run [SUBSET] [run options]       # matrix cells (a subset of bench/matrix.yaml, options on top)
    python -m bench report bench/results.jsonl       # bench/MATRIX.md and its plot
    python -m bench probe [--only NAMES]             # the machine's ceilings
    python -m bench call NAME [--dry-run] [--only STEP,..] [--skip STEP,..] [--set KEY=VALUE ..] [-- RUN OPTIONS]

`python -m bench run --help`, `python -m bench call --help` and so on print each command's options.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = ("list", "run", "report", "probe", "call")


def list_all() -> None:
    from bench.calls import load_calls, load_subsets, subset_arguments

    subsets, calls = load_subsets(), load_calls()
    print("subsets (python -m bench run SUBSET):")
    width = max(map(len, [*subsets, *calls]))
    for name, spec in subsets.items():
        print(f"  {name:{width}}  {spec.get('about') or ' '.join(subset_arguments(name, subsets))}")
    print("calls (python -m bench call NAME):")
    for name, call in calls.items():
        print(f"  {name:{width}}  {call.about}")


def call(argv: list[str]) -> int:
    from bench.calls import CallError, load_calls, run_call

    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    calls = load_calls()
    parser = argparse.ArgumentParser(prog="python -m bench call", description="Runs one named GPU call of "
                                     "bench/calls.yaml: its steps in order, each under its time limit.")
    parser.add_argument("name", choices=sorted(calls), metavar="NAME", help="a call (python -m bench list)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands it would run, run nothing")
    parser.add_argument("--only", default="", help="comma-separated step names to run, the others skipped")
    parser.add_argument("--skip", default="", help="comma-separated step names to skip")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a param of the call")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.set):
        parser.error(f"--set takes KEY=VALUE, not {next(item for item in args.set if '=' not in item)!r}")
    params = dict(item.split("=", 1) for item in args.set)
    try:
        failures = run_call(calls[args.name], args.dry_run, [s for s in args.only.split(",") if s],
                            [s for s in args.skip.split(",") if s], params, extra)
    except CallError as error:
        parser.error(str(error))
    return 1 if failures else 0


def run(argv: list[str]) -> None:
    from bench.calls import CallError, load_subsets, subset_arguments

    if argv and not argv[0].startswith("-"):
        try:
            argv = [*subset_arguments(argv[0], load_subsets()), *argv[1:]]
        except CallError as error:
            raise SystemExit(f"python -m bench run: {error}") from None
    from bench import run as runner

    sys.argv = ["python -m bench run", *argv]
    runner.main()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "list":
        list_all()
    elif command == "call":
        return call(rest)
    elif command == "run":
        run(rest)
    else:
        from bench import probe, report

        sys.argv = [f"python -m bench {command}", *rest]
        (report if command == "report" else probe).main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

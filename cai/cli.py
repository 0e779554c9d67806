"""The ``cai`` console command.

    cai constitution lint DIR
    cai constitution render DIR --kind critique|revision|comparison|cot|score|evasive [--principle ID] [--model PATH]
                                [--preamble base|detailed]
    cai constitution import PATH --format anthropic|hf -o DIR
    cai report RUN_DIR
    cai report --compare RUN_DIR RUN_DIR ... [-o FILE]
"""

from __future__ import annotations

import argparse
import sys

from cai.constitution import (
    KINDS,
    PREAMBLES,
    SAMPLE_CONVERSATION,
    SAMPLE_CRITIQUE,
    SAMPLE_OTHER_RESPONSE,
    SAMPLE_RESPONSE,
    ConstitutionError,
    comparison_messages,
    critique_messages,
    lint_constitution,
    load_constitution,
    resolve_constitution_dir,
    revision_messages,
    score_messages,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cai", description="Constitutional AI pipelines.")
    groups = parser.add_subparsers(dest="group", required=True)
    const = groups.add_parser("constitution", help="check, preview and import constitutions")
    cmds = const.add_subparsers(dest="command", required=True)

    lint = cmds.add_parser("lint", help="check a constitution folder; prints file:line: message per problem")
    lint.add_argument("dir")

    render = cmds.add_parser("render", help="print a prompt exactly as the model will see it")
    render.add_argument("dir")
    render.add_argument("--kind", required=True, choices=KINDS)
    render.add_argument("--principle", help="principle id (default: the first of the matching list)")
    render.add_argument("--model", help="apply this model's chat template: embedded, tiny-random, a folder or a hub id")
    render.add_argument("--round", type=int, default=1, help="revision round shown to critique/revision templates")
    render.add_argument("--preamble", default="base", choices=PREAMBLES,
                        help="comparison/cot: the preamble shown (ai_feedback.preamble)")

    imp = cmds.add_parser("import", help="convert Anthropic's CAI prompt files or an HF llm-swarm JSON")
    imp.add_argument("path", help="anthropic: the folder with CritiqueRevisionInstructions.json; hf: the JSON file")
    imp.add_argument("--format", required=True, choices=("anthropic", "hf"))
    imp.add_argument("-o", "--output", required=True, help="new constitution folder to write")

    report = groups.add_parser("report", help="write RUN_DIR/report.html, or with --compare one page for several runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--compare", action="store_true", help="put several runs (e.g. a sweep's jobs) side by side")
    report.add_argument("-o", "--output", help="--compare: the page to write (default: compare.html beside the runs; "
                                                "for a sweep's jobs/*, in the sweep's folder)")

    args = parser.parse_args(argv)
    if args.group == "report":
        return _report(args)
    if args.command == "lint":
        return _lint(args.dir)
    if args.command == "render":
        return _render(args)
    return _import(args)


def _lint(folder: str) -> int:
    problems = lint_constitution(resolve_constitution_dir(folder))
    for p in problems:
        print(p)
    if problems:
        print(f"{folder}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    c = load_constitution(resolve_constitution_dir(folder))
    print(f"{folder}: ok ({len(c.critique_revision)} critique/revision principles, {len(c.comparison)} comparison "
          f"principles, {len(c.few_shot_critique_revision) + len(c.few_shot_comparison)} few-shot exemplars)")
    return 0


def _render(args) -> int:
    try:
        c = load_constitution(resolve_constitution_dir(args.dir))
        prefix = ""
        if args.kind in ("critique", "revision"):
            p = c.critique_principle(args.principle) if args.principle else c.critique_revision[0]
            if args.kind == "critique":
                messages = critique_messages(c, SAMPLE_CONVERSATION, SAMPLE_RESPONSE, p, args.round)
            else:
                messages = revision_messages(c, SAMPLE_CONVERSATION, SAMPLE_RESPONSE, p, SAMPLE_CRITIQUE, args.round)
        else:
            p = c.comparison_principle(args.principle) if args.principle else c.comparison[0]
            if args.kind in ("score", "evasive"):
                messages, prefix = score_messages(c, SAMPLE_CONVERSATION, SAMPLE_RESPONSE, kind=args.kind)
            else:
                messages, prefix = comparison_messages(c, SAMPLE_CONVERSATION, SAMPLE_RESPONSE, SAMPLE_OTHER_RESPONSE, p,
                                                       kind=args.kind, preamble=args.preamble)
    except ConstitutionError as e:
        print(e, file=sys.stderr)
        return 1
    if args.model:
        from cai.generation import render_chat
        from cai.models import ModelLoadError, load_tokenizer

        try:
            tok = load_tokenizer({"path": args.model})
        except ModelLoadError as e:
            print(e, file=sys.stderr)
            return 1
        print(render_chat(tok, messages, prefix))
        return 0
    for m in messages:
        print(f"--- {m['role']} ---\n{m['content']}\n")
    if prefix:
        print(f"--- assistant (reply starts with; the model continues from here) ---\n{prefix}")
    return 0


def _import(args) -> int:
    from cai.constitution_import import ImportFormatError, import_constitution

    try:
        notes = import_constitution(args.path, args.format, args.output)
    except (ImportFormatError, ConstitutionError) as e:
        print(e, file=sys.stderr)
        return 1
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.output}")
    return 0



def _report(args) -> int:
    from cai.report import write_comparison, write_report

    if not args.compare and (len(args.run_dirs) > 1 or args.output):
        print("cai report: one RUN_DIR writes RUN_DIR/report.html; use --compare for several runs (and -o)", file=sys.stderr)
        return 2
    try:
        path = write_comparison(args.run_dirs, args.output) if args.compare else write_report(args.run_dirs[0])
    except FileNotFoundError as e:
        print(f"cai report: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`tinygpt corpus check|stats|augment CORPUS`: the command over corpus.py (check, stats) and
augment.py (question variants). Apart from both, so that neither imports the other's face."""
from .corpus import check, conflicting_duplicates, format_stats, near_duplicates, stats


def add_arguments(p) -> None:
    """`tinygpt corpus check|stats|augment`'s options (augment's work is augment.py's)."""
    p.description = ("check: report problems (exit 1 if any); stats: counts; augment: write "
                     "CORPUS plus programmatic variants of every question to -o OUT "
                     "(answers and prose untouched)")
    p.add_argument("action", choices=("check", "stats", "augment"))
    p.add_argument("corpus")
    p.add_argument("--tokenizer", help="tokenizer dir or tokenizer.json: enables token counts and the length check "
                                       "(use the tokenizer you train on this corpus: another one counts other tokens)")
    p.add_argument("--n-ctx", type=int, default=128, help="context length for the length check (default 128)")
    p.add_argument("--json", action="store_true", help="stats as JSON")
    p.add_argument("-o", "--output", help="augment: the corpus file to write")
    p.add_argument("--per-question", type=int, default=8, help="augment: variants per question (default 8)")
    p.add_argument("--seed", type=int, default=0, help="augment: random seed; same seed, same output (default 0)")
    p.add_argument("--synonyms", help="augment: synonym table (default: the shipped tinygpt/data/synonyms.txt)")


def run_cli(args) -> None:
    from .ui import existing_file

    if args.action == "augment":
        return _run_augment(args)
    path = existing_file(args.corpus, "corpus file")
    if args.action == "check":
        return _run_check(args, path)
    st = stats(path, args.tokenizer)
    if args.json:
        import json
        print(json.dumps(st, indent=2))
    else:
        print(format_stats(st, path, args.tokenizer))


def _run_check(args, path) -> None:
    """`corpus check`: problems (exit status 1 if any), then warnings, then a summary on stderr."""
    import sys

    problems = check(path, args.tokenizer, args.n_ctx)
    for pr in problems:
        print("%s:%d: %s" % (path, pr.line, pr.message))
    # not errors: training keeps the first of a repeated question, and near duplicates may be meant
    warnings = sorted(conflicting_duplicates(path) + near_duplicates(path), key=lambda p: p.line)
    for pr in warnings:
        print("%s:%d: warning: %s" % (path, pr.line, pr.message))
    if not args.tokenizer:
        print("%s: length check skipped: give --tokenizer DIR (the tokenizer you train on this corpus) to "
              "check that every entry fits %d tokens" % (path, args.n_ctx), file=sys.stderr)
    status = "%d problem(s)" % len(problems) if problems else "ok"
    if warnings:
        status += ", %d warning(s)" % len(warnings)
    print("%s: %s" % (path, status), file=sys.stderr)
    if problems:
        sys.exit(1)


def _run_augment(args) -> None:
    from . import augment
    from .ui import UserError, existing_file

    if not args.output:
        raise UserError("corpus augment needs -o OUT (the file to write)")
    if not 1 <= args.per_question <= augment.MAX_PER_QUESTION:
        raise UserError("--per-question must be from 1 to %d, got %d (more are not distinct: a short question "
                        "has only a few variants)" % (augment.MAX_PER_QUESTION, args.per_question))
    path = existing_file(args.corpus, "corpus file")
    report = augment.augment_file(path, args.output, per_question=args.per_question, seed=args.seed,
                                  synonyms=args.synonyms)
    print(augment.format_report(report, args.output))

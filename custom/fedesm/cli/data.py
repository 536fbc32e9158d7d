"""`fedesm data list|validate|split|synth`: the shipped sets; check, split and generate binding-site sets."""

from __future__ import annotations

import json
import sys

from fedesm.data.readers import FORMAT_EXTENSION, write_records
from fedesm.data.split import MODES, split_records, write_split
from fedesm.data.stats import dataset_stats, format_stats, label_counts
from fedesm.data.synth import synth_comment, synth_records
from fedesm.data.validate import check_file, load_dataset
from fedesm.errors import FedesmError

FORMATS_HELP = (
    "3-line FASTA (.fa/.fasta/.txt: >id [family=NAME], sequence, 0/1 labels), CSV, TSV, Parquet or JSONL "
    "with columns id, sequence, labels[, family]; each may be gzip-compressed (.gz); or a shipped real set "
    "by name, e.g. gpsite:ATP (train split) or gpsite:ATP:test (see `fedesm data list`)"
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="validate, split and generate binding-site data sets",
        description="Validate, split and generate per-residue binding-site data sets. Input formats: " + FORMATS_HELP + ".",
    )
    parser.set_defaults(func=lambda args: _print_help(parser))
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    p = sub.add_parser(
        "list",
        help="the real binding-site sets shipped with fedesm (GPSite, MIT licence)",
        description="List the real per-residue binding-site sets shipped in data/gpsite (GPSite benchmark, "
        "derived from BioLiP, MIT licence; see data/gpsite/SOURCE.md) with their counts. Any command that takes "
        "a data path also takes these names: gpsite:NAME is the training split, gpsite:NAME:test the authors' "
        "low-identity test split.",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "validate",
        help="check data files and print their statistics",
        description="Check data files (label length = sequence length, labels 0/1, residues in ESM-2's alphabet, "
        "no empty sequences, no duplicate ids) and print statistics. On problems, lists the first few "
        "(file:line, record id, what is wrong) and exits 2.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="data file(s): " + FORMATS_HELP)
    p.add_argument("--max-len", type=int, default=1000,
                   help="count sequences longer than this many residues (default: %(default)s)")
    p.add_argument("--max-problems", type=int, default=10,
                   help="problems listed per file before '... N more' (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "split",
        help="split one data set into held-out val/test sets and N federated sites",
        description="Split INPUT into DIR/val.<ext> and DIR/test.<ext> (held out first, family-disjoint), "
        "one folder per site DIR/site-1 ... DIR/site-N with train.<ext> and a site-local val.<ext>, and "
        "DIR/split.json. Modes: iid (random); family (no family in two sites, balanced by residues); "
        "skew (2 sites: site-1 gets 80% of the sequences above the median positive fraction and 20% "
        "of those below); dirichlet (N sites, label buckets shared with Dirichlet(alpha) proportions). "
        "Deterministic for a seed; writes all or nothing.",
    )
    p.add_argument("input", metavar="INPUT", help="data file to split: " + FORMATS_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist, or be empty)")
    p.add_argument("--sites", type=int, required=True, metavar="N", help="number of sites (site-1 .. site-N)")
    p.add_argument("--mode", choices=MODES, default="iid", help="how to share data among sites (default: %(default)s)")
    p.add_argument("--val", type=float, default=0.1, metavar="FRAC",
                   help="fraction of sequences held out as global val (default: %(default)s)")
    p.add_argument("--test", type=float, default=0.1, metavar="FRAC",
                   help="fraction of sequences held out as global test (default: %(default)s)")
    p.add_argument("--site-val", type=float, default=0.1, metavar="FRAC",
                   help="fraction of each site's share kept as its local val set (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet concentration for --mode dirichlet; smaller = more skewed (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--format", choices=sorted(FORMAT_EXTENSION), default="fasta",
                   help="output file format (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace DIR if it holds a previous split (split.json)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser(
        "synth",
        help="generate a SYNTHETIC binding-site set with planted motifs",
        description="Generate a deterministic SYNTHETIC set of protein-like sequences (natural amino-acid "
        "background) with planted, labelled binding motifs (P-loop, C2H2 zinc finger, EF-hand, CxxCH heme), "
        "grouped into families. For demos and tests: not real proteins.",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="output file; the format follows the extension (.fa, .csv, .parquet, .jsonl, optionally .gz)")
    p.add_argument("--n", type=int, default=200, help="number of sequences (default: %(default)s)")
    p.add_argument("--families", type=int, default=10, help="number of families (default: %(default)s)")
    p.add_argument("--pos-rate", type=float, default=0.1,
                   help="wanted fraction of binding residues, at most 0.3 (default: %(default)s)")
    p.add_argument("--min-len", type=int, default=60, help="shortest sequence, at least 40 (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=300, help="longest sequence (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=cmd_synth)


def _print_help(parser) -> int:
    parser.print_help()
    return 2


def cmd_list(args) -> int:
    from fedesm.data.catalog import gpsite_dir, list_sets
    from fedesm.data.readers import read_records

    rows = []
    for entry in list_sets():
        records = read_records(entry["path"])
        rows.append({**entry, **label_counts(records), "max_length": max(len(r) for r in records)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"shipped binding-site sets in {gpsite_dir()} (GPSite benchmark, BioLiP-derived, MIT licence: "
          "see SOURCE.md and LICENSE there)")
    print(f"  {'name':<17} {'ligand':<8} {'split':<5} {'sequences':>9} {'residues':>9} {'positive':>8} {'longest':>7}")
    for r in rows:
        print(f"  {r['name']:<17} {r['ligand']:<8} {r['split']:<5} {r['sequences']:>9,} {r['residues']:>9,} "
              f"{100 * r['positive_fraction']:>7.1f}% {r['max_length']:>7,}")
    print("use a name wherever a data path goes, e.g. `fedesm data split gpsite:ATP --sites 2 --out split/`")
    return 0


def _check_numbers(args, positive=(), seeds=("seed",), finite=()) -> None:
    """The settings' rule for numbers on these flags: seeds 0 .. 2^32-1, counts >= 1, floats finite (one line)."""
    import math

    from fedesm.settings import MAX_INT, MAX_SEED

    for name in seeds:
        value = getattr(args, name, None)
        if value is not None and not 0 <= value <= MAX_SEED:
            raise FedesmError(f"--{name.replace('_', '-')} must be in 0 .. {MAX_SEED:,}, got {value}")
    for name in positive:
        value = getattr(args, name)
        if not 1 <= value <= MAX_INT:
            raise FedesmError(f"--{name.replace('_', '-')} must be in 1 .. {MAX_INT:,}, got {value}")
    for name in finite:
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise FedesmError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")


def cmd_validate(args) -> int:
    _check_numbers(args, positive=("max_len", "max_problems"))
    if args.max_problems < 1:
        raise FedesmError("--max-problems must be at least 1")
    results, all_ok = [], True
    for path in args.paths:
        try:
            records, problems = check_file(path)
        except FedesmError as e:  # the whole file is unreadable: report it, go on with the others
            records, problems = [], [e]
        ok = not problems
        all_ok &= ok
        result = {"path": path, "ok": ok, "problems": [str(e) for e in problems]}
        if ok:
            result["stats"] = dataset_stats(records, args.max_len)
        results.append(result)
        for line in result["problems"][: args.max_problems]:
            print(f"fedesm: error: {line}", file=sys.stderr)
        if len(problems) > args.max_problems:
            print(f"fedesm: error: {path}: ... and {len(problems) - args.max_problems} more problems", file=sys.stderr)
        if ok and not args.json:
            print(f"{path}: OK")
            print(format_stats(result["stats"]))
    if args.json:
        for r in results:
            r["problems"] = r["problems"][: args.max_problems]
        print(json.dumps({"ok": all_ok, "files": results}, indent=2))
    return 0 if all_ok else 2


def cmd_split(args) -> int:
    _check_numbers(args, positive=("sites",), finite=("alpha",))
    records = load_dataset(args.input)
    result = split_records(
        records, mode=args.mode, n_sites=args.sites, val_frac=args.val, test_frac=args.test,
        seed=args.seed, alpha=args.alpha, site_val_frac=args.site_val,
    )
    out = write_split(result, args.out, fmt=args.format, overwrite=args.force)
    print(f"split {args.input} ({len(records)} sequences, mode {args.mode}, seed {args.seed}) into {out}/")
    print(f"  {'part':<14} {'sequences':>9} {'residues':>10} {'positive':>9}")
    rows = [("val", result.val), ("test", result.test)]
    for name in result.sites:
        rows += [(f"{name} train", result.sites[name]), (f"{name} val", result.site_val[name])]
    for name, recs in rows:
        c = label_counts(recs)
        print(f"  {name:<14} {c['sequences']:>9,} {c['residues']:>10,} {100 * c['positive_fraction']:>8.1f}%")
    return 0


def cmd_synth(args) -> int:
    _check_numbers(args, positive=("n", "families", "min_len", "max_len"))
    records = synth_records(args.n, args.families, args.pos_rate, args.min_len, args.max_len, args.seed)
    comment = synth_comment(args.n, args.families, args.pos_rate, args.min_len, args.max_len, args.seed)
    write_records(records, args.out, comment=comment)
    c = label_counts(records)
    print(f"wrote {c['sequences']} SYNTHETIC sequences ({args.families} families, {c['residues']:,} residues, "
          f"{100 * c['positive_fraction']:.1f}% positive) to {args.out}")
    return 0

"""`python -m features.skew --log DIR --model MODEL_DIR`: training/serving skew of each
model input, from the served-feature log and the training statistics saved with the model.

Prints each input's PSI against the training bins and its default rates, worst first;
`--png` draws the worst. Exit 0 when every PSI is at most `--threshold`, 1 when one is
past it, 2 when the report cannot run (no log, no statistics, too few rows).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from features.errors import SkewInputError
from features.skew import report, served, stats

OK, SKEW, BAD_INPUT = 0, 1, 2
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since(text: str) -> float:
    """Unix seconds from `--since`: a span back from now (`90s`, `30m`, `24h`, `7d`) or an
    ISO 8601 time (UTC unless it says otherwise)."""
    span = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if span is not None:
        return time.time() - float(span[1]) * _UNITS[span[2]]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a span back from now (90s, 30m, 24h, 7d) nor an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m features.skew", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--log", type=Path, required=True, help="FEATURES_SERVED_LOG_DIR")
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="the model's directory: `bentoml models get fraud_mlp:latest -o path`",
    )
    parser.add_argument(
        "--since",
        type=since,
        help="only rows served since then: a span back from now (24h, 7d) or an ISO 8601 time",
    )
    parser.add_argument("--threshold", type=float, default=0.2, help="largest PSI that passes")
    parser.add_argument("--min-rows", type=int, default=200, help="fewest served rows to judge")
    parser.add_argument("--png", type=Path, help="write a chart of the worst inputs here")
    parser.add_argument("--worst", type=int, default=6, help="inputs in the chart")
    args = parser.parse_args(argv)

    try:
        trained = stats.load(args.model)
        counts = served.served_counts(args.log, trained, args.since)
    except SkewInputError as exc:
        print(f"skew: {exc}", file=sys.stderr)
        return BAD_INPUT
    for problem in counts.unreadable:
        print(f"skew: skipped {problem}", file=sys.stderr)
    if counts.other_fingerprints:
        others = ", ".join(f"{k} ({v} rows)" for k, v in sorted(counts.other_fingerprints.items()))
        print(f"skew: left out rows served for other features: {others}", file=sys.stderr)
    if counts.rows < args.min_rows:
        print(
            f"skew: {counts.rows} served rows with fingerprint {trained.fingerprint} in"
            f" {args.log}{'' if args.since is None else ' in the --since window'},"
            f" fewer than --min-rows {args.min_rows}",
            file=sys.stderr,
        )
        return BAD_INPUT

    rows = report.compare(trained, counts)
    past = [r for r in rows if r.psi > args.threshold]
    print(report.table(rows, args.threshold))
    print(
        f"\n{counts.rows} served rows in {counts.files} files against {trained.rows} training"
        f" rows (fingerprint {trained.fingerprint}); {len(past)} inputs past PSI {args.threshold}"
    )
    if args.png is not None:
        if importlib.util.find_spec("matplotlib") is None:
            print("skew: --png needs matplotlib (requirements-dev.txt)", file=sys.stderr)
            return BAD_INPUT
        from features.skew.plot import write_png

        write_png(rows[: args.worst], args.png, args.threshold)
        print(f"chart of the {min(args.worst, len(rows))} worst inputs: {args.png}")
    return SKEW if past else OK


if __name__ == "__main__":
    sys.exit(main())

"""What every lesson shares: its flags, its report, its figures.

A lesson is a module ``minipeft.lessons.<name>`` with ``main(argv=None) -> dict``. It
parses the common flags (``--device``, ``--quick``, ``--figures DIR``, ``--seed``,
``--json FILE``), computes or measures its numbers, prints a report in which each
course number stands beside minipeft's own, and returns the key numbers as a dict
(tests and notebooks read that dict).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import check_writable_dir, write_bytes_atomic, write_text_atomic
from ..backend import resolve_device
from ..claims.rules import VERDICTS, Rule, at_least, at_most, check_verdict, verdict  # noqa: F401  (the one rule)


@dataclass
class LessonArgs:
    device: str  # 'cpu' or 'cuda'
    quick: bool  # seconds-long run for tests, notebooks and CI
    figures: Path | None  # where to write figures (None: none written)
    seed: int  # every random choice of the lesson derives from it
    json: Path | None  # where to write the returned dict as JSON
    extra: argparse.Namespace = field(default_factory=argparse.Namespace)  # lesson-specific flags


def parse_args(argv, description: str, add_arguments=None) -> LessonArgs:
    """Parse the common flags (and a lesson's own, added by ``add_arguments(parser)``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default=os.environ.get("MINIPEFT_DEVICE", "cpu"),
                   help="cpu | cuda | auto (default: $MINIPEFT_DEVICE or cpu)")
    p.add_argument("--quick", action="store_true", help="a seconds-long run (tests, notebooks, CI)")
    p.add_argument("--figures", type=Path, default=None, metavar="DIR", help="write the lesson's figures here")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    if add_arguments is not None:
        add_arguments(p)
    ns = p.parse_args(argv)
    _check_common(p, ns)
    try:
        device = resolve_device(ns.device)
    except (ValueError, RuntimeError) as e:
        p.exit(2, f"{p.prog}: error: --device {ns.device}: {e}\n")
    common = {"device", "quick", "figures", "seed", "json"}
    extra = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k not in common})
    return LessonArgs(device, ns.quick, ns.figures, ns.seed, ns.json, extra)


def _check_common(p: argparse.ArgumentParser, ns) -> None:
    """Refuse, before any work, a negative seed and output paths that cannot be written (one line, exit 2)."""
    problems = []
    if ns.seed < 0:
        problems.append(f"--seed {ns.seed}: must be >= 0")
    if ns.json is not None:
        why = ("it is a directory; give a file name such as results.json" if ns.json.is_dir()
               else check_writable_dir(ns.json.parent))
        if why:
            problems.append(f"--json {ns.json} cannot be written ({why})")
    if ns.figures is not None:
        why = check_writable_dir(ns.figures)
        if why:
            problems.append(f"--figures {ns.figures} cannot be created ({why})")
    if problems:
        p.exit(2, f"{p.prog}: error: {'; '.join(problems)}\n")


class Report:
    """A lesson's printed report: sections, and rows of (what, course, minipeft)."""

    def __init__(self, title: str, stream=None):
        self.stream = stream or sys.stdout
        self.t0 = time.perf_counter()
        self._print("=" * 78)
        self._print(title)
        self._print("=" * 78)

    def _print(self, s: str = "") -> None:
        print(s, file=self.stream, flush=True)

    def section(self, title: str) -> None:
        self._print()
        self._print(f"-- {title} " + "-" * max(0, 74 - len(title)))

    def text(self, s: str) -> None:
        self._print(s)

    def compare(self, rows, headers=("", "course", "minipeft")) -> None:
        """Rows of (label, course value, minipeft value); values pre-formatted or numbers."""
        self.table(rows, headers)

    def claim(self, label: str, course, ours, relation, verdict: str, note: str = "") -> str:
        """One line a student can read: the course's number, minipeft's, how they relate, and the verdict.

        ``relation`` says how the two are compared ("LoRA/FT = 0.97", or a Rule's text);
        ``verdict`` is one of VERDICTS, as :func:`verdict` (or a :class:`Rule`) computed it.
        Returns the line printed.
        """
        check_verdict(verdict)
        line = f"  {label}: course {_fmt(course)} | minipeft {_fmt(ours)} | {relation} -> {verdict.upper()}"
        if note:
            line += f" ({note})"
        self._print(line)
        return line

    def table(self, rows, headers) -> None:
        cells = [[_fmt(c) for c in headers]] + [[_fmt(c) for c in r] for r in rows]
        ragged = [r for r in cells[1:] if len(r) != len(headers)]
        if ragged:
            raise ValueError(f"table row {ragged[0]} has {len(ragged[0])} cells for {len(headers)} headers")
        widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
        for j, r in enumerate(cells):
            line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            self._print("  " + line.rstrip())
            if j == 0:
                self._print("  " + "  ".join("-" * w for w in widths))

    def done(self) -> None:
        self._print()
        self._print(f"(finished in {time.perf_counter() - self.t0:.1f} s)")


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5 or a < 1e-3:
            return f"{v:.3g}"
        return f"{v:,.4g}" if a < 100 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,d}"
    return str(v)


def save_figure(fig, args: LessonArgs, name: str) -> Path | None:
    """Write ``fig`` as ``<figures>/<name>.png`` when ``--figures`` was given."""
    if args.figures is None:
        return None
    import matplotlib.pyplot as plt

    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return write_bytes_atomic(args.figures / f"{name}.png", buf.getvalue())  # never half a PNG


def finish(result: dict, args: LessonArgs, report: Report | None = None, lesson: str | None = None) -> dict:
    """Print the verdicts of ``lesson``'s course claims on ``result`` and close ``report``; write JSON if asked.

    The verdicts are those ``figures/claims.json`` gives a recorded run of the lesson: the
    same claims, the same rules (``minipeft.claims``), applied to this run's numbers.
    """
    if report is not None:
        if lesson is not None:
            from ..claims import lesson_claims

            report.section("The course's claims, judged on this run (the rules of figures/claims.json)")
            lesson_claims(lesson, json.loads(json.dumps(result, default=float)), report)
        report.done()
    if args.json is not None:  # atomic: a kill never leaves half a JSON file
        write_text_atomic(args.json, json.dumps(result, indent=2, default=float))
    return result
